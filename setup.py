from setuptools import setup

# transform/ and serve/ live at the top of the repository but install as
# easympt.transform and easympt.serve: nothing imports a bare `transform`.
setup(
    packages=["easympt", "easympt.generation", "easympt.training", "easympt.transform", "easympt.serve"],
    package_dir={"easympt": "easympt", "easympt.transform": "transform", "easympt.serve": "serve"},
    package_data={"easympt": ["demo_model/*"]},  # the bundled demo model (HF format)
)
