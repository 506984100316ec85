"""The native CPU kernel (kernels/*.cpp built by CMakeLists.txt); falls back to the PyTorch path."""


def available():
    return False


def status():
    return "the native CPU kernel is not built yet"
