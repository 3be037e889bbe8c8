"""Process tooling for multi-node deployments: a native SuperLink + SuperNodes topology and development certificates."""
