# CMake platform description for WASI (CMake before 3.31 does not know the system name).
# Static executables and libraries only: WASI preview1 has no dynamic loading.
set(WASI 1)
set(UNIX 1)
set_property(GLOBAL PROPERTY TARGET_SUPPORTS_SHARED_LIBS FALSE)
set(CMAKE_STATIC_LIBRARY_PREFIX "lib")
set(CMAKE_STATIC_LIBRARY_SUFFIX ".a")
set(CMAKE_EXECUTABLE_SUFFIX "")
set(CMAKE_FIND_LIBRARY_PREFIXES "lib")
set(CMAKE_FIND_LIBRARY_SUFFIXES ".a")
# find_package/find_library search each root of CMAKE_FIND_ROOT_PATH (the sysroot, each dependency's
# install prefix) at its top: <root>/include, <root>/lib, <root>/lib/pkgconfig.
set(CMAKE_SYSTEM_PREFIX_PATH "/")
set(CMAKE_LIBRARY_ARCHITECTURE wasm32-wasip1)
