"""A real S3-protocol server on 127.0.0.1 for tests: moto's standalone server, bytes over HTTP.

`S3Server` runs it in this process (`ThreadedMotoServer`), so it can be stopped and started
again on the same port with its objects kept (moto's state lives in the process); curate's
own processes reach it through the standard AWS environment variables (`env`).
`start_authenticating_server` runs one in a subprocess with IAM authentication on, for the
wrong-credentials test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            if time.time() > deadline:
                raise TimeoutError(f"no S3 server on 127.0.0.1:{port}") from None
            time.sleep(0.05)


class S3Server:
    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server = None

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        wait_listening(self.port)

    def ensure_running(self) -> None:
        """Start the server again if nothing answers on its port (seen once in a whole-suite run: the
        module's server stopped answering between two tests; the cause is not known)."""
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            self.stop()
            self.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    @property
    def env(self) -> dict[str, str]:
        """What a user sets to point curate (boto/s3fs) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-never-logged",
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self):
        import boto3

        e = self.env
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]


@dataclass
class AuthServer:
    proc: subprocess.Popen
    endpoint: str
    key_id: str
    secret: str


def start_authenticating_server(bucket: str) -> AuthServer:
    """moto with IAM authentication: only the access key created here may use `bucket`."""
    import boto3

    port = free_port()
    # The first 3 requests (creating the user, its key and its policy) are let through unsigned.
    env = dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT="3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_listening(port)
    endpoint = f"http://127.0.0.1:{port}"
    anon = {
        "endpoint_url": endpoint,
        "region_name": REGION,
        "aws_access_key_id": "x",
        "aws_secret_access_key": "y",
    }
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="curate")
    key = iam.create_access_key(UserName="curate")["AccessKey"]
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="curate", PolicyName="s3", PolicyDocument=json.dumps(policy))
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=key["AccessKeyId"],
        aws_secret_access_key=key["SecretAccessKey"],
    )
    s3.create_bucket(Bucket=bucket)
    return AuthServer(proc, endpoint, key["AccessKeyId"], key["SecretAccessKey"])
