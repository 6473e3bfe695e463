"""One scheduler per model: the queue discipline, admission, preemption, worker capacity;
image and video schedulers.
"""
