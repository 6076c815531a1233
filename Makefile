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

venv: $(STAMP) $(VENV)/.globloc-layout $(VENV)/.globloc_msgs

$(STAMP): requirements.txt requirements-ros.txt requirements-dev.txt pyproject.toml ros/ros2cli_venv/pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q -r requirements-dev.txt
	if [ -d $(OVERLAY) ]; then bash $(OVERLAY)/build.sh $(VENV); \
	  else echo "note: $(OVERLAY) not found: no ros2 CLI, launch or tf2 here; their tests will be skipped"; fi
	$(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e .
	if [ -x $(VENV)/bin/ros2 ] && ! $(VENV)/bin/python -c 'import ros2run' 2>/dev/null \
	  && ! $(VENV)/bin/python -c 'import ros2interface' 2>/dev/null; then \
	  $(VENV)/bin/pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e ros/ros2cli_venv; fi
	touch $(STAMP)

# The editable install's ament layout in the venv's own prefix, as symlinks into this checkout (what colcon's
# --symlink-install does): `ros2 launch/run/pkg globloc_ros` work and edits need no reinstall. Redone when a file
# is added to or removed from launch/, config/ or models/.
$(VENV)/.globloc-layout: $(STAMP) globloc_ros/share.py ros/globloc_ros/package.xml launch config models
	$(VENV)/bin/python -m globloc_ros.share $(VENV)
	touch $@

# globloc_msgs (ros/globloc_msgs) built into the venv with CMake and the rosidl wheels, as the overlay builds
# tf2_msgs; redone only when its sources change.
$(VENV)/.globloc_msgs: $(STAMP) scripts/build_msgs.sh $(wildcard ros/globloc_msgs/* ros/globloc_msgs/msg/*)
	bash scripts/build_msgs.sh $(VENV) ros/globloc_msgs
	touch $@

# With the overlay, a skipped ROS test (launch, tf2, node, colcon, messages) fails `make test` (test/conftest.py).
test: venv
	GLOBLOC_REQUIRE_ROS=$$(test -d $(OVERLAY) && echo 1 || echo 0) $(VENV)/bin/python -m pytest -q test

demo: venv
	$(VENV)/bin/python -m globloc.demo

demo-rgbd: venv
	$(VENV)/bin/python -m globloc.demo --depth

demo-train: venv
	$(VENV)/bin/python -m globloc.demo --train

bench: venv
	$(VENV)/bin/python -m globloc bench

clean:
	rm -rf $(VENV) .ros-log build *.egg-info
