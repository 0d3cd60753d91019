from a2a_bench.cli import main

main()
