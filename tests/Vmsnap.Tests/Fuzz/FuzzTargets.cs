using System.Diagnostics;
using System.Reflection;
using Vmsnap.Migration;
using Vmsnap.Qcow2;
using Vmsnap.Storage;
using Vmsnap.VmState;
using Vmsnap.Tests;

namespace Vmsnap.Fuzz;

/// <summary>
/// The fuzzing targets: each takes an input as bytes and runs one parser over it the way vmsnap's
/// commands do. Bad input must end in one of the project's own exceptions; anything else escaping
/// <see cref="Run"/> is a crash. Compiled into the fuzzing harness (fuzz/Vmsnap.Fuzz) and into the
/// tests, which replay the findings through the same code.
/// </summary>
internal static class FuzzTargets
{
    /// <summary>Bytes read per request: enough to cross clusters, small enough to stay fast.</summary>
    private const int ReadBytes = 64 << 10;

    /// <summary>A VM state up to this size is read and parsed whole; a larger one only at its start.</summary>
    private const long WholeVmState = 8 << 20;

    /// <summary>Blocks of a stream that get a file in the load target (more would only slow it down).</summary>
    private const int MaxRamFiles = 8;

    public static readonly IReadOnlyDictionary<string, Action<byte[], string>> All = new Dictionary<string, Action<byte[], string>>
    {
        ["qcow2"] = (input, _) => Qcow2(input),
        ["stream"] = Stream,
    };

    /// <summary>Runs a target; returns null when the input was accepted, the exception when it was refused as bad input.</summary>
    /// <exception cref="Exception">Any other exception: a crash.</exception>
    public static Exception? Run(string target, byte[] input, string scratch)
    {
        try
        {
            All[target](input, scratch);
            return null;
        }
        catch (Exception e) when (IsExpected(e))
        {
            return e;
        }
    }

    /// <summary>
    /// Open (header, extensions, snapshot table, L1), check (refcounts, every L1/L2 table of the image and its
    /// snapshots), read (guest data through L2 tables, compressed clusters, the VM state of every snapshot).
    /// </summary>
    public static void Qcow2(byte[] input)
    {
        using var device = new MemoryBlockDevice(input) { IsReadOnly = true };
        using Qcow2Image image = Qcow2Image.Open(device, "fuzz.qcow2", new Qcow2OpenOptions { ReadOnly = true, OpenBackingFile = false });
        _ = image.Info;
        image.Check();
        byte[] buffer = new byte[ReadBytes];
        long size = image.VirtualSize;
        foreach (long at in new[] { 0, size / 2, size - ReadBytes })
        {
            long offset = Math.Max(0, at);
            int n = (int)Math.Min(ReadBytes, size - offset);
            if (n > 0) image.Read(buffer.AsSpan(0, n), offset);
        }
        foreach (Qcow2Snapshot snapshot in image.Snapshots.Take(4))
        {
            if (snapshot.VmStateSize == 0) continue;
            using Qcow2VmStateArea area = image.OpenVmStateAreaForReading(snapshot);
            if (snapshot.VmStateSize > WholeVmState)
            {
                area.Read(buffer, 0);
                continue;
            }
            // What `vmsnap inspect IMAGE TAG` does: parse the VM state through the area.
            using var backend = VmStateBackend.ForBlockDevice(area, 0, snapshot.VmStateSize);
            using var reader = new VmStateReader(backend, ReadBytes);
            try
            {
                MigrationStream.Inspect(reader);
            }
            catch (VmsnapException)
            {
                // The stream's own errors are the stream target's business; go on with the image.
            }
        }
    }

    /// <summary>
    /// A migration stream: inspect it from a block device (read-ahead), index its pages, copy it from a pipe
    /// (sequential), then load it into new RAM files in <paramref name="scratch"/> and once more into those files,
    /// now existing (written in place).
    /// </summary>
    public static void Stream(byte[] input, string scratch)
    {
        using (var device = new MemoryBlockDevice(input) { IsReadOnly = true })
        using (var backend = VmStateBackend.ForBlockDevice(device))
        using (var reader = new VmStateReader(backend, 4096))
            MigrationStream.Inspect(reader);
        using (var device = new MemoryBlockDevice(input) { IsReadOnly = true })
        using (var backend = VmStateBackend.ForBlockDevice(device))
        using (var reader = new VmStateReader(backend, 4096))
        {
            // Where a postcopy source would look for pages: the index, and each block's first and last page.
            MigrationStreamIndex index = MigrationStreamIndex.Build(reader);
            for (int b = 0; b < index.Blocks.Count; b++)
            {
                index.Find(b, 0);
                index.Find(b, index.Blocks[b].Length / 4096 - 1);
            }
        }
        using (var pipe = new MemoryStream(input, writable: false))
        using (var backend = VmStateBackend.ForStream(pipe))
        using (var reader = new VmStateReader(backend, 4096))
        using (var copyTarget = new MemoryVmStateBackend())
        using (var writer = new VmStateWriter(copyTarget))
        {
            MigrationStream.Copy(reader, writer);
            writer.Close();
        }

        Directory.CreateDirectory(scratch);
        try
        {
            for (int pass = 0; pass < 2; pass++)
            {
                using var device = new MemoryBlockDevice(input) { IsReadOnly = true };
                using var backend = VmStateBackend.ForBlockDevice(device);
                using var reader = new VmStateReader(backend, 4096);
                using var sink = new EveryBlockSink(scratch);
                MigrationStream.Read(reader, sink);
            }
        }
        finally
        {
            foreach (string file in Directory.GetFiles(scratch)) File.Delete(file);
        }
    }

    /// <summary>
    /// True for what bad input may end in: the project's exceptions, and argument checks of the method the
    /// target called itself (an <see cref="ArgumentException"/> thrown deeper in vmsnap means bad data reached
    /// an internal call unchecked: a crash).
    /// </summary>
    public static bool IsExpected(Exception e)
    {
        if (e is VmsnapException) return true;
        if (e is not ArgumentException) return false;
        Assembly vmsnap = typeof(VmsnapException).Assembly, harness = typeof(FuzzTargets).Assembly;
        StackFrame[] frames = new StackTrace(e, false).GetFrames();
        int caller = Array.FindIndex(frames, f => f.GetMethod()?.DeclaringType?.Assembly == harness);
        if (caller < 1) return false;
        // Frames below the called method (caller - 1) must be the runtime's argument helpers only.
        for (int i = 0; i < caller - 1; i++)
            if (frames[i].GetMethod()?.DeclaringType?.Assembly == vmsnap) return false;
        return true;
    }

    /// <summary>Loads the stream's first blocks into files named by their index, whatever the blocks are called.</summary>
    private sealed class EveryBlockSink(string dir) : IRamSink, IDisposable
    {
        private RamFileSink? _inner;

        public void BeginBlocks(IReadOnlyList<RamBlockInfo> blocks)
        {
            _inner = new RamFileSink(blocks.Take(MaxRamFiles).Select((b, i) => new KeyValuePair<string, string>(b.Id, Path.Combine(dir, $"block{i}.ram"))))
            {
                SyncOnComplete = false,
            };
            _inner.BeginBlocks(blocks);
        }

        public void WritePages(int block, long offset, ReadOnlySpan<byte> pages) => _inner!.WritePages(block, offset, pages);

        public void WriteZeroPages(int block, long offset, long length) => _inner!.WriteZeroPages(block, offset, length);

        public void Complete() => _inner!.Complete();

        public void Dispose() => _inner?.Dispose();
    }
}
