from tests.attestation.conftest import sim_root

__all__ = ["sim_root"]
