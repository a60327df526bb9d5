//! CUDA kernels (behind the `cuda` feature). Without the feature, constructors return `Error::CudaNotCompiled`.
