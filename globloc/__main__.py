from globloc.cli import main

main()
