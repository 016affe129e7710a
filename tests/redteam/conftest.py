from tests._servers import start_server  # noqa: F401  (fixture)
