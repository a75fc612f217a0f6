"""The contracts that cross folio's boundaries.

`messages` holds them as plain dataclasses (what the code passes around in a
process); `worker.proto` holds the same step messages on the wire, and `codec`
converts between the two. Nothing crosses a network as pickle.
"""
