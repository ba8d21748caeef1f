using Vmsnap.Storage;
using Vmsnap.Storage.LowLevel;

namespace Vmsnap.Qcow2;

/// <summary>
/// A device that reads through to another one and keeps its own writes, resizes and discards in
/// memory: a rehearsal of changes that leaves the file below untouched (the dirty-image repair is
/// tried on one before it is made for real).
/// </summary>
internal sealed class ScratchOverlay(IBlockDevice below) : IBlockDevice
{
    private const int PageBits = 12;
    private const int PageSize = 1 << PageBits;
    private readonly Dictionary<long, byte[]> _pages = [];
    private long _length = below.Length;
    private long _belowVisible = below.Length;   // bytes of the device below still visible (a shrink hides the rest for good)

    public long Length => _length;
    public bool IsReadOnly => false;
    public int Alignment => 1;

    public int Read(Span<byte> buffer, long offset)
    {
        if (offset >= _length) return 0;
        int n = (int)Math.Min(buffer.Length, _length - offset);
        for (int done = 0; done < n;)
        {
            long pos = offset + done;
            long page = pos >> PageBits;
            int inPage = (int)(pos & (PageSize - 1));
            int chunk = Math.Min(n - done, PageSize - inPage);
            Span<byte> part = buffer.Slice(done, chunk);
            if (_pages.TryGetValue(page, out byte[]? data)) data.AsSpan(inPage, chunk).CopyTo(part);
            else ReadBelow(part, pos);
            done += chunk;
        }
        return n;
    }

    private void ReadBelow(Span<byte> part, long pos)
    {
        int visible = (int)Math.Clamp(_belowVisible - pos, 0, part.Length);
        int got = visible > 0 ? below.Read(part[..visible], pos) : 0;
        part[got..].Clear();
    }

    public void Write(ReadOnlySpan<byte> buffer, long offset)
    {
        for (int done = 0; done < buffer.Length;)
        {
            long pos = offset + done;
            int inPage = (int)(pos & (PageSize - 1));
            int chunk = Math.Min(buffer.Length - done, PageSize - inPage);
            buffer.Slice(done, chunk).CopyTo(Page(pos >> PageBits).AsSpan(inPage));
            done += chunk;
        }
        _length = Math.Max(_length, offset + buffer.Length);
    }

    private byte[] Page(long page)
    {
        if (_pages.TryGetValue(page, out byte[]? data)) return data;
        data = new byte[PageSize];
        ReadBelow(data, page << PageBits);
        _pages.Add(page, data);
        return data;
    }

    public ValueTask<int> ReadAsync(Memory<byte> buffer, long offset, CancellationToken cancellationToken = default) =>
        ValueTask.FromResult(Read(buffer.Span, offset));

    public ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, long offset, CancellationToken cancellationToken = default)
    {
        Write(buffer.Span, offset);
        return ValueTask.CompletedTask;
    }

    public void Flush() { }

    public void SetLength(long length)
    {
        if (length < _length)
        {
            foreach (long page in _pages.Keys.Where(p => p << PageBits >= length).ToList()) _pages.Remove(page);
            if (_pages.TryGetValue(length >> PageBits, out byte[]? last)) last.AsSpan((int)(length & (PageSize - 1))).Clear();
            _belowVisible = Math.Min(_belowVisible, length);
        }
        _length = length;
    }

    public void Discard(long offset, long length)
    {
        long end = Math.Min(offset + length, _length);
        if (offset < end) Write(new byte[end - offset], offset);
    }

    public void Dispose() { }
}
