"""The native part of the build: pyproject.toml holds the metadata, this only the C extension.

fabric.dataplane._native (fabric/dataplane/_native.c) does the data path's AEAD of a
batch through OpenSSL's EVP API; it needs a C compiler and OpenSSL's headers
(Debian: gcc, libc6-dev, python3-dev, libssl-dev). It is optional: without them
the install still succeeds and fabric.dataplane.aead uses its pure-Python path.

fabric.dataplane._offload (fabric/dataplane/_offload.c) cuts the TUN's TSO/USO super
packets into segments, joins TCP segments into super packets for TUN writes, and
receives UDP datagrams in batches (recvmmsg, UDP GRO); its pure-Python twins are in
fabric/dataplane/segment.py, gro.py and udp.py. It needs only the
compiler. FABRIC_REQUIRE_NATIVE=1 makes a missing one an import error (CI).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fabric.dataplane._native",
            ["fabric/dataplane/_native.c"],
            libraries=["crypto"],
            extra_compile_args=["-std=c99", "-Wall", "-Wextra"],
            optional=True,
        ),
        Extension(
            "fabric.dataplane._offload",
            ["fabric/dataplane/_offload.c"],
            extra_compile_args=["-std=c99", "-O2", "-Wall", "-Wextra"],
            optional=True,
        ),
    ],
)
