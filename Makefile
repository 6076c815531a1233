# Two commands for a fresh machine: `make demo` (the end-to-end demo) and `make test`.
# Both create or refresh .venv from the pinned requirement files; a second run with nothing
# changed only checks the stamp.
PYTHON ?= python3.11
VENV := .venv
OVERLAY ?= ../shared/ros-overlay
STAMP := $(VENV)/.globloc-stamp
export ROS_LOG_DIR ?= $(CURDIR)/.ros-log
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST

.PHONY: venv test demo demo-rgbd demo-train bench clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt setup.py package.xml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-dev.txt
	if [ -d $(OVERLAY) ]; then bash $(OVERLAY)/build.sh $(VENV); \
	  else echo "note: $(OVERLAY) not found: launch/tf2 tests will be skipped"; fi
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

test: venv
	$(VENV)/bin/python -m pytest -q test

demo: venv
	$(VENV)/bin/python -m globloc_ros.demo

demo-rgbd: venv
	$(VENV)/bin/python -m globloc_ros.demo --depth

demo-train: venv
	$(VENV)/bin/python -m globloc_ros.demo --train

bench: venv
	$(VENV)/bin/python -m globloc bench

clean:
	rm -rf $(VENV) .ros-log build *.egg-info
