"""Moving image bytes in and out: where imports come from (``sources``, ``http_source``),
how they are checked (``checksums``, ``sidecar``) and unpacked (``compression``), the one
streaming pass that writes them (``stream``), and where exports go (``export_sinks``)."""
