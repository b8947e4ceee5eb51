from setuptools import find_packages, setup

setup(
    name="queuectl",
    version="1.0.0",
    description="A persistent background job queue for shell commands, driven from the CLI",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["queuectl", "queuectl.*"]),
    package_data={"queuectl": ["static/*"]},
    python_requires=">=3.9",
    install_requires=["click>=8.0", "croniter>=2.0"],
    extras_require={"test": ["pytest>=7", "pytest-mock>=3", "pytest-xdist>=3", "prometheus-client>=0.12"],
                    "postgres": ["psycopg[binary]>=3.1"]},
    entry_points={"console_scripts": ["queuectl=queuectl.cli:main"]},
    classifiers=["Programming Language :: Python :: 3", "Operating System :: POSIX"],
)
