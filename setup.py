"""mm_plugin: LLaVA-1.5 training and inference on megatron-core (CUDA, Ascend NPU, CPU).

Install torch first (the build that matches your accelerator), then this package:
    pip install torch==2.13.0 && pip install -e .[test]
"""

from setuptools import Extension, find_packages, setup

# Image resize + crop + normalise in C, bit-equal to Pillow's bicubic resize (mm_plugin/data/_resample.c).
# Optional: without a C compiler the package installs and uses Pillow for the same result, slower.
RESAMPLE = Extension("mm_plugin.data._resample", ["mm_plugin/data/_resample.c"],
                     extra_compile_args=["-O3", "-ffp-contract=off"], optional=True)

setup(
    name="mm_plugin",
    version="0.1.0",
    description="LLaVA-1.5 on megatron-core: one installable plugin for NVIDIA GPUs, Ascend NPUs and CPUs",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The runtime patches live in the top-level patches/ folder and ship as mm_plugin.patches.
    packages=find_packages(include=["mm_plugin", "mm_plugin.*"]) + ["mm_plugin.patches"],
    package_dir={"mm_plugin.patches": "patches"},
    include_package_data=True,
    ext_modules=[RESAMPLE],
    install_requires=[
        "torch>=2.6",
        # 0.12.x: the line current MindSpeed supports; 0.16.x: the newest for Python 3.11.
        "megatron-core>=0.12,!=0.13.*,!=0.14.*,!=0.15.*,<0.17",
        "transformers>=5,<6",
        "wrapt>=1.14",
        "pillow>=10",
        "simplejpeg>=1.8",  # JPEG decoding (libjpeg-turbo), bit-equal to Pillow's and faster
        "sentencepiece>=0.2",
        "protobuf>=4",
        "safetensors>=0.4",
        "numpy>=1.24",
        "psutil>=5.9",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "packaging>=23",
    ],
    extras_require={"test": ["pytest>=8", "hypothesis>=6", "peft>=0.14"]},
    entry_points={
        "console_scripts": [
            "mm-convert=mm_plugin.console:mm_convert",
            "mm-data=mm_plugin.console:mm_data",
            "mm-pretrain=mm_plugin.console:mm_pretrain",
            "mm-infer=mm_plugin.console:mm_infer",
            "mm-plot=mm_plugin.console:mm_plot",
        ]
    },
)
