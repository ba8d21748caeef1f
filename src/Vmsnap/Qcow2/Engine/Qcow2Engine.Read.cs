using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>Guest reads: map the range under the lock, then read outside it.</summary>
internal sealed partial class Qcow2Engine
{
    internal enum ExtentKind { Zero, Data, Backing, Compressed }

    /// <summary>A run of guest bytes with one source. For compressed runs, Host is the offset inside the cluster.</summary>
    internal record struct Extent(ExtentKind Kind, long Guest, long Length, long Host, ulong CompressedWord);

    /// <summary>
    /// Reads guest bytes through <paramref name="l1"/> (the active L1 table when null) at any offset:
    /// past the virtual disk too (the VM-state area). Unmapped bytes come from the backing file or are zero.
    /// </summary>
    internal void ReadGuest(Span<byte> buffer, long offset, L1Table? l1 = null)
    {
        if (buffer.IsEmpty) return;
        if (offset < 0 || offset > ClusterGeometry.MaxGuestOffset - buffer.Length)
            throw new ArgumentOutOfRangeException(nameof(offset), offset, "guest offset out of range");
        var extents = new List<Extent>(4);
        RequestGate.Request? registration = null;
        lock (SyncRoot)
        {
            ThrowIfDisposed();
            l1 ??= State.ActiveL1;
            if (l1.IsActive) registration = Gate.Enter(offset, buffer.Length, write: false);
            try
            {
                Mapping.MapRange(l1, offset, buffer.Length, extents);
                Caches.Trim();
            }
            catch
            {
                if (registration is not null) Gate.Leave(registration);
                throw;
            }
        }
        try
        {
            foreach (Extent x in extents)
                ReadExtent(x, buffer.Slice((int)(x.Guest - offset), (int)x.Length));
        }
        finally
        {
            if (registration is not null) lock (SyncRoot) Gate.Leave(registration);
        }
    }

    /// <summary><see cref="ReadGuest"/> on an I/O thread (several can be in flight).</summary>
    internal ValueTask ReadGuestAsync(Memory<byte> buffer, long offset, L1Table? l1 = null) =>
        BlockingIo.Run(() => ReadGuest(buffer.Span, offset, l1));

    /// <summary><see cref="WriteGuest"/> on an I/O thread (several can be in flight on disjoint ranges).</summary>
    internal ValueTask WriteGuestAsync(ReadOnlyMemory<byte> data, long offset) =>
        BlockingIo.Run(() => WriteGuest(data.Span, offset));

    private void ReadExtent(Extent x, Span<byte> destination)
    {
        switch (x.Kind)
        {
            case ExtentKind.Zero:
                destination.Clear();
                break;
            case ExtentKind.Backing:
                if (State.Backing is null) destination.Clear();
                else State.Backing.ReadAt(destination, x.Guest);
                break;
            case ExtentKind.Data:
                int n = Device.Read(destination, x.Host);
                if (n < destination.Length) destination[n..].Clear();   // the file's last cluster may be short
                break;
            case ExtentKind.Compressed:
                Decompress(x.CompressedWord).AsSpan((int)x.Host, destination.Length).CopyTo(destination);
                break;
        }
    }

    /// <summary>The decompressed content of a compressed cluster (the last one is kept for sequential small reads).</summary>
    internal byte[] Decompress(ulong word)
    {
        lock (State.DecompressLock)
        {
            (ulong lastWord, byte[]? last) = State.LastDecompressed;
            if (last is not null && lastWord == word) return last;
        }
        var e = new L2Entry(word, 0);
        (long offset, int length) = e.CompressedRange(Geometry);
        byte[] input = new byte[length];
        int n = Device.Read(input, offset);
        if (n <= 0)
            throw Corrupt("compressed cluster", offset, "lies beyond the end of the file");
        byte[] output = new byte[Geometry.ClusterSize];
        var type = (Qcow2CompressionType)Header.CompressionType;
        if (!ClusterDecompressor.TryDecompress(type, input.AsSpan(0, n), output, out string? problem))
            throw Corrupt("compressed cluster", offset, $"cannot be decompressed ({type.ToString().ToLowerInvariant()}): {problem}");
        lock (State.DecompressLock) State.LastDecompressed = (word, output);
        return output;
    }
}
