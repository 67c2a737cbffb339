"""The post-deployment repair stage (sec. 3.3): CycleGAN trigger learning and the treatment set."""
