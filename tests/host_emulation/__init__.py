"""Host emulation of the CUDA kernels: ``kernels/*.cu`` compiled as C++ and run via ctypes."""
