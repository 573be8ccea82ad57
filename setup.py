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
        "blobfile",
        "Pillow",
        "opencv-python-headless",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # mpirun support (torchrun needs nothing extra): mpi4py and an MPI (MPICH wheels).
        # On a cluster with its own MPI, `pip install mpi4py` builds against that instead.
        "mpi": ["mpi4py", "mpich"],
        # the test suite runs both launchers
        "dev": ["pytest", "ruff", "mpi4py", "mpich"],
        "lsun": ["lmdb"],
    },
)
