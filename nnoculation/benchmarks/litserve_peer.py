"""The peer of the serving benchmark: the same BadNet behind LitServe, with LitServe's own
dynamic batching at the batch size and wait our service uses, and the same decoding.

    python -m nnoculation.benchmarks.litserve_peer --store DIR --deployment NAME --port P

LitServe (``pip install litserve``) is a benchmark-only dependency. Notes from LitServe 0.2.x:
a raw body reaches ``decode_request`` only when its parameter is annotated as ``bytes`` with a
``Body(media_type=...)``; the batch size and timeout go on the ``LitAPI``. (No ``from
__future__ import annotations`` here: LitServe reads that annotation at run time.)
"""

import argparse
from pathlib import Path
from typing import Annotated, Any

import litserve as ls
import torch
from fastapi import Body

from models.store import ModelStore
from nnoculation.deployment import load_deployment
from nnoculation.inputs import DecodePolicy, decode_image


class BadNetAPI(ls.LitAPI):  # type: ignore[misc]
    """The BadNet alone, decoded and batched like our service does. Module-level: LitServe
    pickles the API into its inference worker processes."""

    def __init__(self, store: str, deployment: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.store, self.deployment = store, deployment

    def setup(self, device: str) -> None:
        torch.set_num_threads(1)
        self.model = load_deployment(ModelStore(Path(self.store)), self.deployment, device="cpu")
        self.policy = DecodePolicy.for_spec(self.model.spec)

    def decode_request(
        self, request: Annotated[bytes, Body(media_type="image/png")]
    ) -> torch.Tensor:
        return decode_image(request, self.model.spec, self.policy)

    def batch(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(inputs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.predict_single("badnet", x)

    def unbatch(self, output: torch.Tensor) -> list[int]:
        return output.tolist()

    def encode_response(self, output: int) -> dict[str, Any]:
        label = int(output)
        return {"label": label, "class_name": self.model.class_names[label]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-timeout-ms", type=float, default=2.0)
    parser.add_argument("--api-servers", type=int, default=1, help="LitServe's HTTP processes")
    args = parser.parse_args()
    api = BadNetAPI(
        args.store,
        args.deployment,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1000,
    )
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1)
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=args.api_servers,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
