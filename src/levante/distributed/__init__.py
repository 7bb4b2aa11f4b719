"""Beyond one device: tensor parallelism over torch.distributed, and replicas."""
