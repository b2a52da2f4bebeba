"""Moving KV blocks between two workers: transfers under leases, the channels, the wire format.

The prefill side offers a finished prefill's blocks and hands out a
``TransferHandle``; the decode side pulls the blocks it lacks over a
``KVChannel`` into tensors it has reserved, then releases the transfer.
"""
