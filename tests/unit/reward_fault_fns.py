"""Reward functions with faults, for the RewardPool tests (spawned workers import them by module
path)."""
import time


def length_reward(response: str, answer: str) -> float:
    return float(len(response))


def hang_on_hang(response: str, answer: str) -> float:
    if response == "hang":
        time.sleep(60)
    return 1.0


def raise_on_boom(response: str, answer: str) -> float:
    if response == "boom":
        raise RuntimeError("verifier crashed")
    return 1.0


def allocate_on_big(response: str, answer: str) -> float:
    if response == "big":
        return float(len(bytearray(2 * 2**30)))  # 2 GiB, far over the test's memory limit
    return 1.0


NOT_CALLABLE = 3
