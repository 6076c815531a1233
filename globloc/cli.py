"""`globloc`: the offline package's command (never imports rclpy).

Each subcommand lives in its own module, which provides `add_arguments(parser)` and `run(args)`;
modules are imported only when their subcommand runs, so `globloc --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    'synth': ('globloc.synth', 'write a synthetic multi-sequence scene as rosbag2 bags'),
    'info': ('globloc.bags', 'summarise a bag or a folder of bags'),
    'train': ('globloc.train', 'train a model from bags'),
    'map': ('globloc.mapper', "build a map of the place from bags, to refine the node's poses against"),
    'eval': ('globloc.evaluate', 'evaluate a model on bags: JSON report and plots'),
    'compare': ('globloc.compare', 'this method vs ablation vs baselines, one table'),
    'relocalize-compare': ('globloc.relocalize_compare',
                           'relocalization on a query pass: globloc (one-shot, + map) beside SIFT + PnP-RANSAC, '
                           'one table'),
    'export': ('globloc.export', 'export a model to ONNX, TorchScript or a TensorRT engine'),
    'bench': ('globloc.bench', 'latency benchmark of the runtime backends'),
    'node-bench': ('globloc.node_bench', 'end-to-end latency and frames/s of the ROS 2 node over DDS'),
    'bench-scale': ('globloc.bench_scale', 'peak memory and time of each command against the recording length'),
    'bench-place': ('globloc.bench_place', "a place map's size, load time, memory and per-frame cost against the "
                    "place's area"),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog='globloc', description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if argv and argv[0] == name:  # only the chosen subcommand's module is imported
            mod = importlib.import_module(module)
            mod.add_arguments(p)
            p.set_defaults(_run=mod.run)
    args = parser.parse_args(argv)
    try:
        sys.exit(args._run(args) or 0)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        # Bad input ends with one clear line, not a traceback; exit code 2 like argparse errors.
        print(f'globloc {args.command}: error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
