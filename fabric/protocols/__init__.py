"""Wire protocols, one package each, behind fabric.protocols.base."""
