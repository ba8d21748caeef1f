using SharpFuzz;
using Vmsnap.Fuzz;

// Usage:
//   Vmsnap.Fuzz TARGET              under afl-fuzz (fuzz/run.sh): SharpFuzz's fork server, input on stdin
//   Vmsnap.Fuzz TARGET FILE...      run each input once and say how it ended (exit 1 if one crashed)
// Targets: qcow2, stream (see FuzzTargets).
if (args.Length < 1 || !FuzzTargets.All.ContainsKey(args[0]))
{
    Console.Error.WriteLine($"usage: Vmsnap.Fuzz {string.Join("|", FuzzTargets.All.Keys)} [FILE...]");
    return 2;
}
string target = args[0];
string scratch = Path.Combine(Environment.GetEnvironmentVariable("VMSNAP_FUZZ_SCRATCH") ?? Path.GetTempPath(), $"vmsnap-fuzz-{Environment.ProcessId}");
try
{
    if (args.Length == 1)
    {
        Fuzzer.OutOfProcess.Run(stream =>
        {
            using var input = new MemoryStream();
            stream.CopyTo(input);
            FuzzTargets.Run(target, input.ToArray(), scratch);
        });
        return 0;
    }
    int crashes = 0;
    foreach (string file in args.Skip(1))
    {
        try
        {
            Exception? refused = FuzzTargets.Run(target, File.ReadAllBytes(file), scratch);
            Console.WriteLine(refused is null ? $"ok    {file}" : $"bad   {file}: {refused.GetType().Name}: {refused.Message}");
        }
        catch (Exception e)
        {
            crashes++;
            Console.WriteLine($"CRASH {file}: {e}");
        }
    }
    return crashes == 0 ? 0 : 1;
}
finally
{
    try { if (Directory.Exists(scratch)) Directory.Delete(scratch, recursive: true); } catch (IOException) { }
}
