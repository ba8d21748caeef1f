// Benchmarks are console harnesses that run vmsnap side by side with its baselines; see bench/README.md.
using Vmsnap.Bench;

if (args.Length > 0 && args[0] == "vmstate") return VmStateBench.Run(args[1..]);
if (args.Length > 0 && args[0] == "vmstate-area") return VmStateAreaBench.Run(args[1..]);
if (args.Length > 0 && args[0] == "snapshot-scale") return SnapshotScaleBench.Run(args[1..]);
if (args.Length > 0 && args[0] == "overlap") return OverlapBench.Run(args[1..]);
Console.Error.WriteLine("usage: Vmsnap.Bench vmstate|vmstate-area --dir DIR [options] | snapshot-scale build|dirty --image PATH [options] | overlap --image PATH [options]  (see bench/README.md)");
return 2;
