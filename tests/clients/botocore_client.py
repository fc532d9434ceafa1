"""Resolve container credentials exactly as botocore does inside a pod.

Configured like an application pod: AWS_CONTAINER_CREDENTIALS_FULL_URI and
AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE. Prints the credentials as one JSON line,
or the exception botocore raised (type and message) on stderr with exit code 1.
"""

import json
import sys

import botocore
from botocore.credentials import ContainerProvider


def main() -> int:
    try:
        creds = ContainerProvider().load()
        if creds is None:
            print("ContainerProvider found no configuration", file=sys.stderr)
            return 1
        frozen = creds.get_frozen_credentials()
        print(json.dumps({
            "access_key_id": frozen.access_key,
            "secret_access_key": frozen.secret_key,
            "session_token": frozen.token,
            "botocore": botocore.__version__,
        }))
        return 0
    except Exception as e:  # noqa: BLE001 - report whatever botocore raised, as an app would log it
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
