"""Ray Serve applications (import paths for `serve run` and KubeRay serveConfigV2)."""
