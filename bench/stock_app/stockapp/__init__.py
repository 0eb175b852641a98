"""Stock Flower FedAvg app with the sigmax-fl model: the bench's baseline."""
