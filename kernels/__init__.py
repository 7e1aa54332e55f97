"""CUDA kernel sources of gpufusion (installed as ``gpufusion.kernels``).

One ``.cu`` file per algorithm; each file's header names its ``__global__`` functions and the
NumPy reference function it mirrors. They are compiled at run time by the cached getters in
:mod:`gpufusion.backends.cuda_kernels`, never at import time.
"""
