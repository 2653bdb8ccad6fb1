from setuptools import find_packages, setup


setup(
    name="enat-diffusers",
    version="0.1.0",
    description="ENAT (EfficientNAT) and AutoNAT masked-token image generation for diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["enat_diffusers", "enat_diffusers.*"]),
    package_data={"enat_diffusers.conversion": ["imagenet_classes.json"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "diffusers>=0.42,<0.43",
        "transformers>=5.0,<6",
        "accelerate>=1.0",  # diffusers' low-memory loading (and, later, training)
        "safetensors",
        "numpy",
        "Pillow",
    ],
    extras_require={
        # the offline CLIP tokenizer reads open_clip's BPE file (install it with --no-deps: only the file is used)
        "tokenizer": ["open_clip_torch"],
        # the training scripts read their data with datasets' imagefolder
        "train": ["datasets", "tensorboard", "matplotlib"],
        # examples/evaluate.py (FID, IS). torch-fidelity requires torchvision but only its InceptionV3, which needs
        # torch alone, is used: where no torchvision build matches torch, install it with --no-deps (so "test" leaves
        # it out, as it leaves out open_clip_torch: pip would resolve torchvision and replace a CPU torch)
        "eval": ["torchmetrics>=1.9", "torch-fidelity>=0.3"],
        # quantized sampling through diffusers' TorchAoConfig / PipelineQuantizationConfig (benchmarks/README.md)
        "quantization": ["torchao>=0.18"],
        # ftfy: open_clip's reference tokenizer; torchao: tests/test_quantization.py
        "test": ["datasets", "pytest", "pytest-xdist", "peft", "tensorboard", "matplotlib", "ftfy",
                 "torchmetrics>=1.9", "torchao>=0.18"],
    },
)
