"""OpenVPN 2.6 over UDP behind fabric.protocols.base (work in progress: not registered yet).

Section references: `file function` of OpenVPN's source at tag v2.6.14, as in
shared/openvpn-protocol.md.
"""
