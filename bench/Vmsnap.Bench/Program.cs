// Benchmarks are console harnesses that run vmsnap side by side with its baselines; see bench/README.md.
Console.Error.WriteLine("usage: Vmsnap.Bench <benchmark> (none built yet)");
return 2;
