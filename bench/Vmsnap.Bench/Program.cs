// Benchmarks are console harnesses that run vmsnap side by side with its baselines; see bench/README.md.
using Vmsnap.Bench;

if (args.Length > 0 && args[0] == "vmstate") return VmStateBench.Run(args[1..]);
Console.Error.WriteLine("usage: Vmsnap.Bench vmstate --dir DIR --mode gather|buffered [options]  (see bench/README.md)");
return 2;
