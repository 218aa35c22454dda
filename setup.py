"""Builds tadrop's optional CPU kernels (tadrop_cli/_kernels.c); everything else is in pyproject.toml.

Where no C compiler is found the build goes on without them (optional=True), and tadrop runs
the same maths in PyTorch (see tadrop_cli/kernels.py).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tadrop_cli._kernels",
            ["tadrop_cli/_kernels.c"],
            # -ffp-contract=off: no fused multiply-adds, so that every float operation rounds
            # once, as torch's do, and the results are the same bits; -fno-trapping-math (no FP
            # traps are ever enabled) lets the compiler vectorize the loops with comparisons
            extra_compile_args=[
                "-O3",
                "-std=gnu11",
                "-fopenmp",
                "-ffp-contract=off",
                "-fno-math-errno",
                "-fno-trapping-math",
            ],
            extra_link_args=["-fopenmp"],
            optional=True,
        )
    ]
)
