// cub::BlockScan's host stand-in lives with BlockReduce's (block_reduce.cuh).
#pragma once
#include "block_reduce.cuh"
