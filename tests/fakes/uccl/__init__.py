"""A CPU fake of the ``uccl`` package (its ``uccl.ep`` module only). Tests only: see :mod:`uccl.ep`."""
