"""Process orchestration for running sigmax-fl on real Flower processes.

``processes`` starts and reliably stops child process trees, ``credentials``
creates throwaway TLS and SuperNode-authentication material, and ``flwr_cli``
drives ``flower-superlink``, ``flower-supernode`` and the ``flwr`` CLI on top
of both. The simulation runner, the integration tests and ``make deploy-local``
share them.
"""
