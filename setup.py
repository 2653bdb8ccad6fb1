from setuptools import find_packages, setup


setup(
    name="enat-diffusers",
    version="0.1.0",
    description="ENAT (EfficientNAT) and AutoNAT masked-token image generation for diffusers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    packages=find_packages(include=["enat_diffusers", "enat_diffusers.*"]),
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
        # conversion reads ImageNet class names from torchvision; the offline CLIP tokenizer uses open_clip's BPE file
        "convert": ["torchvision"],
        "tokenizer": ["open_clip_torch"],
        "test": ["pytest", "torchvision", "open_clip_torch"],
    },
)
