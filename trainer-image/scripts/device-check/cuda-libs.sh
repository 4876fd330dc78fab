# Sourced by the device-check scripts on the GPU machine: puts PyTorch's NVIDIA wheels'
# libraries on LD_LIBRARY_PATH.
# The binary links libcublas/libcurand/libnvrtc of CUDA 13: take them from PyTorch's wheels.
libs=$(python3 - <<'PY' 2>/dev/null
import glob, os
try:
    import nvidia
    roots = list(nvidia.__path__)
except ImportError:
    roots = []
dirs = set()
for r in roots:
    for f in glob.glob(os.path.join(r, "**", "lib", "*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH=${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
