from setuptools import setup

setup(
    name="guided-diffusion",
    version="0.1.0",
    description="ADM (guided-diffusion) with Epsilon Scaling (ADM-ES): sampling, training, "
    "exposure-bias tools and a TensorFlow-free evaluator",
    python_requires=">=3.9",
    packages=["guided_diffusion", "evaluations"],
    install_requires=[
        "torch>=2.0",
        "numpy",
        "scipy",
        "mpi4py",
        "blobfile",
        "Pillow",
        "opencv-python-headless",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        "dev": ["pytest", "ruff", "mpich"],
        "lsun": ["lmdb"],
    },
)
