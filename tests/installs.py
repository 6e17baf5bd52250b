"""The commands that install each optional package the tests use, as .ci/run installs it: the
skip messages name these (``test_the_install_commands_are_the_ones_ci_runs`` holds them to .ci/run).

``pip install -e '.[test]'`` brings snnTorch, scikit-learn, matplotlib, tqdm and safetensors, but
neither Lightning nor Norse: Norse declares torchvision, which would replace the CPU build of torch
with a CUDA one, so it is installed without its dependencies (its recurrent LIF modules need only
torch, nir and nirtorch).
"""

TEST_EXTRA = "pip install torch==2.13.0 -e '.[test]'"
LIGHTNING = "pip install torch==2.13.0 lightning"
NORSE = "pip install torch==2.13.0 h5py && pip install --no-deps norse nir nirtorch"

INSTALLS = {
    "snntorch": TEST_EXTRA,
    "sklearn": TEST_EXTRA,
    "matplotlib": TEST_EXTRA,
    "safetensors": TEST_EXTRA,
    "lightning": LIGHTNING,
    "norse": NORSE,
}
WHY = {"norse": "without its dependencies: it declares torchvision, which would replace the CPU torch"}


def not_installed(package: str) -> str:
    """The skip message for a missing ``package``: what installs it."""
    if package not in INSTALLS:
        return f"{package} is not installed (neither the project's extras nor .ci/run install it)"
    why = f", {WHY[package]}" if package in WHY else ""
    return f"{package} is not installed ({INSTALLS[package]}{why}; .ci/run installs it so)"
