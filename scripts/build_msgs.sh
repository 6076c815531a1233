#!/usr/bin/env bash
# scripts/build_msgs.sh VENV SRC: build the ament_cmake interface package SRC (ros/globloc_msgs) with CMake and
# the rosidl wheels, and install it into VENV, as ../shared/ros-overlay/build.sh builds tf2_msgs (it needs that
# overlay's generators: without them it says so and does nothing). The Makefile runs it when SRC changes.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 VENV SRC" >&2; exit 2; }
V=$(cd "$1" && pwd); SRC=$(cd "$2" && pwd); PKG=$(basename "$SRC")
if [ ! -d "$V/share/rosidl_default_generators" ]; then
  echo "note: no rosidl generators in $V (they come with ../shared/ros-overlay): $PKG not built"
  exit 0
fi
B=$V/.build/$PKG
mkdir -p "$B"
exec 9>"$B/lock"; flock -w 600 9   # one build at a time
export _ROS_WHEELS_BOOTSTRAP_COMPLETE=1   # the wheels' .pth re-exec is not needed: LD_LIBRARY_PATH is set here
export PATH="$V/bin:$PATH" AMENT_PREFIX_PATH="$V" CMAKE_PREFIX_PATH="$V"
LD_LIBRARY_PATH="$V/lib:$(ls -d "$V"/lib/python3.11/site-packages/ros_*.libs | tr '\n' :)${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH
echo "building $PKG into $V (logs in $B)"
cmake -S "$SRC" -B "$B" -DCMAKE_INSTALL_PREFIX="$V" -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
      -DPython3_EXECUTABLE="$V/bin/python" -DCMAKE_INSTALL_RPATH="$V/lib" -DCMAKE_INSTALL_RPATH_USE_LINK_PATH=ON \
      >"$B/configure.log" 2>&1 || { tail -40 "$B/configure.log"; exit 1; }
cmake --build "$B" -j"$(nproc)" >"$B/build.log" 2>&1 || { grep -iE 'error' "$B/build.log" | head -20; exit 1; }
cmake --install "$B" >"$B/install.log" 2>&1 || { tail -20 "$B/install.log"; exit 1; }
echo "$PKG installed into $V"
