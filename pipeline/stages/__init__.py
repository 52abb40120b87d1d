"""Stage workers. Each runs inside its own env and imports only the light core plus its backend."""
