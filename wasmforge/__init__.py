"""wasmforge: build language interpreters and C libraries for WebAssembly/WASI."""

__version__ = "0.1.0"
