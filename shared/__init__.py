"""tierserve common library, in layers: wire, contract, data, serving, client, tools, builder."""

__version__ = "0.1.0"
