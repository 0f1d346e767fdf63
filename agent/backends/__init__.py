"""backends: the object stores the cloud copy goes to (see docs/DESIGN.md for what this room may
import).

protocol.py (the `Backend` contract) · registry.py (which services exist: one line each) ·
service.py (what a service module provides) · local.py, azure.py, s3.py, gcs.py (one per
service: its keys, credential rules, factory, probe target) · objstore.py (the obstore adapter
they share) · failures.py (errors mapped to agent.errors) · retry.py (backoff, retrying) ·
secrets.py, urls.py, connections.py (shared helpers) · config.py (the [backend] table).

A new service: write agent/backends/<service>.py defining `SERVICE = Service(...)`, add its
module to registry.SERVICE_MODULES, and run tests/system/test_backend_conformance.py against it.
"""
