using Vmsnap.Storage;
using Vmsnap.VmState;

namespace Vmsnap.Tests.VmState;

/// <summary>
/// Tests that count live native buffers (<see cref="AlignedBuffer.LiveCount"/> is process-wide) run
/// alone, after the parallel ones.
/// </summary>
[CollectionDefinition(Name, DisableParallelization = true)]
public sealed class NativeMemoryCollection
{
    public const string Name = "VmState native memory";
}

/// <summary>A may-free owner that records how often it was disposed and how many bytes were written by then.</summary>
internal sealed class TrackedOwner(Func<long>? written = null) : IDisposable
{
    public int DisposeCount { get; private set; }

    /// <summary>The writer's BytesTransferred when this was disposed.</summary>
    public long WrittenAtDispose { get; private set; } = -1;

    public void Dispose()
    {
        DisposeCount++;
        WrittenAtDispose = written?.Invoke() ?? -1;
    }
}

/// <summary>
/// The naive writer the real one must match byte for byte: every call appends to a list, big-endian
/// by shifting, no buffering at all.
/// </summary>
internal sealed class ReferenceWriter
{
    private readonly List<byte> _bytes = new();

    public long Tell => _bytes.Count;

    public byte[] ToArray() => _bytes.ToArray();

    public void PutByte(byte v) => _bytes.Add(v);

    public void PutBe16(ushort v)
    {
        _bytes.Add((byte)(v >> 8));
        _bytes.Add((byte)v);
    }

    public void PutBe32(uint v)
    {
        for (int shift = 24; shift >= 0; shift -= 8) _bytes.Add((byte)(v >> shift));
    }

    public void PutBe64(ulong v)
    {
        for (int shift = 56; shift >= 0; shift -= 8) _bytes.Add((byte)(v >> shift));
    }

    public void PutBuffer(ReadOnlySpan<byte> data)
    {
        foreach (byte b in data) _bytes.Add(b);
    }
}

/// <summary>One call of a random script.</summary>
internal abstract record WriterOp;

internal sealed record ByteOp(byte Value) : WriterOp;

internal sealed record Be16Op(ushort Value) : WriterOp;

internal sealed record Be32Op(uint Value) : WriterOp;

internal sealed record Be64Op(ulong Value) : WriterOp;

internal sealed record BufferOp(byte[] Data) : WriterOp;

/// <summary>PutBufferAsync of managed memory (a slice of a larger array), optionally with a tracked owner.</summary>
internal sealed record AsyncOp(byte[] Array, int Offset, int Length, bool WithOwner) : WriterOp;

/// <summary>PutBufferAsync of native memory whose may-free owner frees it: use after free shows.</summary>
internal sealed record NativeAsyncOp(byte[] Data) : WriterOp;

internal sealed record FlushOp : WriterOp;

/// <summary>Random call sequences and how to run them against the real and the reference writer.</summary>
internal static class WriterScript
{
    /// <summary>The same seed always gives the same calls with fresh (unshared) memory.</summary>
    public static List<WriterOp> Generate(int seed, int maxOps = 40, int maxLarge = 96 * 1024)
    {
        var r = new Random(seed);
        var ops = new List<WriterOp>();
        int count = r.Next(1, maxOps + 1);
        for (int i = 0; i < count; i++)
        {
            switch (r.Next(12))
            {
                case 0: ops.Add(new ByteOp((byte)r.Next(256))); break;
                case 1: ops.Add(new Be16Op((ushort)r.Next(65536))); break;
                case 2: ops.Add(new Be32Op((uint)r.NextInt64(1L << 32))); break;
                case 3: ops.Add(new Be64Op((ulong)r.NextInt64() ^ ((ulong)r.Next(2) << 63))); break;
                case 4: ops.Add(new BufferOp(Bytes(r, r.Next(0, 300)))); break;
                case 5: ops.Add(new BufferOp(Bytes(r, r.Next(300, maxLarge)))); break;
                case 6:
                case 7:
                {
                    int length = r.Next(2) == 0 ? r.Next(1, 300) : r.Next(300, maxLarge);
                    int offset = r.Next(0, 64);
                    byte[] array = Bytes(r, offset + length + r.Next(0, 64));
                    ops.Add(new AsyncOp(array, offset, length, r.Next(2) == 0));
                    break;
                }
                case 8:
                {
                    // Two adjacent slices of one array in a row (gather mode merges them).
                    byte[] array = Bytes(r, r.Next(2, 9000));
                    int cut = r.Next(1, array.Length);
                    ops.Add(new AsyncOp(array, 0, cut, false));
                    ops.Add(new AsyncOp(array, cut, array.Length - cut, r.Next(2) == 0));
                    break;
                }
                case 9: ops.Add(new NativeAsyncOp(Bytes(r, r.Next(1, 20000)))); break;
                case 10: ops.Add(new FlushOp()); break;
                default:
                    // Runs of small scalars, as device state is.
                    for (int k = r.Next(1, 200); k > 0; k--) ops.Add(new Be32Op((uint)r.Next()));
                    break;
            }
        }
        return ops;
    }

    public static byte[] Bytes(Random r, int length)
    {
        byte[] b = new byte[length];
        r.NextBytes(b);
        return b;
    }

    public static byte[] Reference(List<WriterOp> ops)
    {
        var w = new ReferenceWriter();
        foreach (WriterOp op in ops)
        {
            switch (op)
            {
                case ByteOp o: w.PutByte(o.Value); break;
                case Be16Op o: w.PutBe16(o.Value); break;
                case Be32Op o: w.PutBe32(o.Value); break;
                case Be64Op o: w.PutBe64(o.Value); break;
                case BufferOp o: w.PutBuffer(o.Data); break;
                case AsyncOp o: w.PutBuffer(o.Array.AsSpan(o.Offset, o.Length)); break;
                case NativeAsyncOp o: w.PutBuffer(o.Data); break;
            }
        }
        return w.ToArray();
    }

    /// <summary>
    /// Runs the calls on <paramref name="writer"/>, checking Tell against the reference after every
    /// call, overwriting asynchronous memory once a flush released it; returns the owners handed out.
    /// </summary>
    public static List<TrackedOwner> Run(VmStateWriter writer, List<WriterOp> ops, bool checkTell = true)
    {
        var owners = new List<TrackedOwner>();
        var released = new List<byte[]>(); // memory the caller may reuse after the next flush
        long expected = 0;
        foreach (WriterOp op in ops)
        {
            switch (op)
            {
                case ByteOp o: writer.PutByte(o.Value); expected += 1; break;
                case Be16Op o: writer.PutBe16(o.Value); expected += 2; break;
                case Be32Op o: writer.PutBe32(o.Value); expected += 4; break;
                case Be64Op o: writer.PutBe64(o.Value); expected += 8; break;
                case BufferOp o:
                    writer.PutBuffer(o.Data);
                    // Copied: the caller may scribble on it at once.
                    Array.Fill(o.Data, (byte)0xEE);
                    expected += o.Data.Length;
                    break;
                case AsyncOp o:
                {
                    TrackedOwner? owner = o.WithOwner ? new TrackedOwner() : null;
                    if (owner is not null) owners.Add(owner);
                    writer.PutBufferAsync(o.Array.AsMemory(o.Offset, o.Length), owner);
                    released.Add(o.Array);
                    expected += o.Length;
                    break;
                }
                case NativeAsyncOp o:
                {
                    var native = new AlignedBuffer(o.Data.Length, 64);
                    o.Data.CopyTo(native.GetSpan());
                    writer.PutBufferAsync(native.Memory, native);
                    expected += o.Data.Length;
                    break;
                }
                case FlushOp:
                    writer.Flush();
                    foreach (byte[] a in released) Array.Fill(a, (byte)0xDD);
                    released.Clear();
                    break;
            }
            if (checkTell) Assert.Equal(expected, writer.Tell());
        }
        return owners;
    }
}
